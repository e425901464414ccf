-- Argo CD health check for visionft.io/VisionFineTune.
--
-- Install it under the key resource.customizations.health.visionft.io_VisionFineTune of the argocd-cm
-- ConfigMap (deploy/argocd/argocd-cm-health.yaml carries the exact snippet; a test keeps the two equal).
-- Argo CD runs it with gopher-lua (Lua 5.1): `obj` is the live object, and the script returns
-- {status = ..., message = ...}.
--
-- Mapping, first match wins:
--   no status yet, or status.observedGeneration behind metadata.generation   -> Progressing
--   condition Stalled=True: a run that can't start and needs a person (invalid spec, a child the
--     apiserver refused, a pod the Job can't create, an image that can't be pulled, a missing
--     Secret, a policy violation)                                            -> Degraded
--   phase Failed (or condition Failed=True)                                  -> Degraded
--   phase Succeeded (or condition Ready=True)                                -> Healthy
--   phase Suspended                                                          -> Suspended
--   spec.suspend true while the operator has not suspended the run yet       -> Progressing
--   phase Pending, Queued, Initializing, Training, Uploading (a Pending run that waits for a node or
--     for quota says so: its message leads with Ready's reason, e.g. Unschedulable) -> Progressing
--   anything else                                                            -> Unknown

local function condition(o, wanted)
  if o.status == nil or o.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(o.status.conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function explain(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason .. ": " .. c.message
    end
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local function progress_text(o, phase)
  local text = phase
  local ready = condition(o, "Ready")
  if phase == "Pending" and ready ~= nil and ready.reason ~= nil and ready.reason ~= ""
      and ready.reason ~= "InProgress" then
    text = text .. " (" .. ready.reason .. ")"
  end
  local p = o.status.progress
  if p ~= nil then
    if p.summary ~= nil and p.summary ~= "" then
      text = text .. " " .. p.summary
    elseif p.step ~= nil and p.totalSteps ~= nil then
      text = text .. " " .. tostring(p.step) .. "/" .. tostring(p.totalSteps)
    end
    if p.loss ~= nil then
      text = text .. ", loss " .. string.format("%.4g", p.loss)
    end
    if p.eta ~= nil and p.eta ~= "" then
      text = text .. ", ETA " .. p.eta
    end
  end
  if o.status.message ~= nil and o.status.message ~= "" then
    text = text .. ": " .. o.status.message
  end
  return text
end

local function check(o)
  local hs = {}
  if o.status == nil or o.status.phase == nil then
    hs.status = "Progressing"
    hs.message = "Waiting for the VisionFT operator to pick up the resource"
    return hs
  end
  local generation = o.metadata and o.metadata.generation
  local observed = o.status.observedGeneration
  if generation ~= nil and (observed == nil or observed < generation) then
    hs.status = "Progressing"
    hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
    return hs
  end

  local phase = o.status.phase
  local stalled = condition(o, "Stalled")
  local failed = condition(o, "Failed")
  if is_true(stalled) then
    hs.status = "Degraded"
    hs.message = explain(stalled, "Stalled")
    return hs
  end
  if phase == "Failed" or is_true(failed) then
    hs.status = "Degraded"
    hs.message = explain(failed, o.status.message or "Failed")
    return hs
  end
  if phase == "Succeeded" or is_true(condition(o, "Ready")) then
    hs.status = "Healthy"
    local outputs = o.status.outputs
    if outputs ~= nil and outputs.adapterUri ~= nil then
      hs.message = "Succeeded: adapter at " .. outputs.adapterUri
    elseif outputs ~= nil and outputs.mergedUri ~= nil then
      hs.message = "Succeeded: merged model at " .. outputs.mergedUri
    else
      hs.message = "Succeeded"
    end
    return hs
  end
  if phase == "Suspended" then
    hs.status = "Suspended"
    hs.message = o.status.message or "Suspended by spec.suspend; checkpoints are kept to resume"
    return hs
  end
  if o.spec ~= nil and o.spec.suspend == true then
    hs.status = "Progressing"
    hs.message = "Suspending"
    return hs
  end
  if phase == "Pending" or phase == "Queued" or phase == "Initializing" or phase == "Training"
      or phase == "Uploading" then
    hs.status = "Progressing"
    hs.message = progress_text(o, phase)
    return hs
  end
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
  return hs
end

return check(obj)
