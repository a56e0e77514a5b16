-- Orthanc -> dicomnode routing.
--
-- Every stable MR series is queued as an asynchronous C-STORE job to the modality "dicomnode"
-- (see dicomnode.json). dicomnode itself decides which series are sagittal T2 fat-sat spine
-- series and ignores the others (counted in its metrics), so this script needs no series filter.
-- What dicomnode sends back is a Secondary Capture series (Modality OT), never MR, and anything
-- that arrived from dicomnode's AE title is skipped as well: nothing loops.
-- Failed jobs are listed under Orthanc's Jobs and can be resubmitted there.

DICOMNODE_MODALITY = 'dicomnode'    -- key in "DicomModalities"
DICOMNODE_AET = 'DICOMNODE'         -- dicomnode's [node] ae_title

function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] ~= 'MR' then
    return
  end
  if metadata['RemoteAET'] == DICOMNODE_AET then
    return
  end
  local body = { Resources = { seriesId }, Synchronous = false }
  RestApiPost('/modalities/' .. DICOMNODE_MODALITY .. '/store', DumpJson(body, true))
  print('dicomnode-route: queued series ' .. seriesId .. ' for ' .. DICOMNODE_MODALITY)
end
